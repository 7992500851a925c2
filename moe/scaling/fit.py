"""Scaling-law fits: Chinchilla approach 3, IsoFLOP parabolas (approach 2) and Clark et al.'s MoE law.

Owns: the numerics only (numpy + scipy). Inputs are plain arrays, outputs are plain dicts that
serialise to JSON; reading runs, CLIs and plots live in `moe.scaling.runner` and `moe.scaling.plot`.

    fit = fit_chinchilla(n_active, tokens, loss)          # L = E + A/N^alpha + B/D^beta
    compute_optimal(fit["params"], 1e21)                    # N*(C), D*(C), L* with C = 6 N D
    fit_isoflop(n_active, budget_flops, loss)               # parabola in log N per budget
    fit_moe(n_active, num_experts, loss)                    # log L = a log N + b log E^ + c log N log E^ + d

Every fit raises `FitError` (a `ValueError`) with one line saying what is missing, e.g. fewer points
than parameters.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022 app. D.2
CHINCHILLA_KEYS = ("E", "A", "B", "alpha", "beta")
# Hoffmann et al. app. D.2 grid of initialisations, over (alpha, beta, e=log E, a=log A, b=log B).
INIT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


def _one_blas_thread():
    """Many tiny L-BFGS solves: multi-threaded BLAS only adds contention (30x slower on 2 loaded cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: fits are correct without it, only slower
        return contextlib.nullcontext()
    return threadpool_limits(1)


class FitError(ValueError):
    """The data cannot support the requested fit; the message says why."""


def _arrays(*xs) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=np.float64).ravel() for x in xs]
    if len({len(x) for x in out}) != 1:
        raise FitError(f"inputs have different lengths: {[len(x) for x in out]}")
    for x in out:
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise FitError("every N, D, C, E and loss must be a finite positive number")
    return out


def _need(n_points: int, n_params: int, form: str) -> None:
    if n_points < n_params:
        raise FitError(f"{form} fit has {n_params} parameters but only {n_points} points; "
                       f"run at least {n_params} finished points (more is better)")


def _interval(samples: np.ndarray) -> list[float]:
    """Central 95% percentile interval of bootstrap samples (NaN-free rows only)."""
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        return [math.nan, math.nan]
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


# --- Chinchilla approach 3 ------------------------------------------------------------------------


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Summed Huber loss on log-loss residuals and its gradient (Hoffmann et al. 2022, eq. D.2).

    log L_hat = LSE(a - alpha log N, b - beta log D, e): the log of E + A/N^alpha + B/D^beta with
    a = log A, b = log B, e = log E, which keeps all three terms positive without bounds.
    """
    a, b, e, alpha, beta = theta
    terms_3P = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top_P = terms_3P.max(0)  # hand-written LSE: scipy's logsumexp costs 10x more on ~50 points
    w_3P = np.exp(terms_3P - top_P)
    total_P = w_3P.sum(0)
    r_P = top_P + np.log(total_P) - log_l
    w_3P /= total_P  # softmax: d pred / d term
    abs_P = np.abs(r_P)
    small_P = abs_P <= HUBER_DELTA
    loss = np.where(small_P, 0.5 * r_P**2, HUBER_DELTA * (abs_P - 0.5 * HUBER_DELTA)).sum()
    dr_P = np.where(small_P, r_P, HUBER_DELTA * np.sign(r_P))
    g_3 = w_3P @ dr_P
    return loss, np.array([g_3[0], g_3[1], g_3[2], -(dr_P * w_3P[0]) @ log_n, -(dr_P * w_3P[1]) @ log_d])


def _lbfgs(theta0, log_n, log_d, log_l) -> tuple[np.ndarray, float]:
    # Tight tolerances: in Huber's linear regime the default ftol stops ~0.03 short in alpha.
    res = minimize(_huber_objective, theta0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    return res.x, float(res.fun)


def _grid_scores(inits_G5: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    """Summed Huber loss at every initialisation in one vectorised pass."""
    a, b, e, alpha, beta = (inits_G5[:, i, None] for i in range(5))
    terms_GP3 = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape[:1] + log_n.shape)], -1)
    r_GP = logsumexp(terms_GP3, axis=-1) - log_l
    return np.where(np.abs(r_GP) <= HUBER_DELTA, 0.5 * r_GP**2,
                    HUBER_DELTA * (np.abs(r_GP) - 0.5 * HUBER_DELTA)).sum(-1)


def _fit_theta(log_n, log_d, log_l, inits: list[np.ndarray]) -> np.ndarray:
    best, best_loss = None, math.inf
    for theta0 in inits:
        theta, loss = _lbfgs(np.asarray(theta0, dtype=np.float64), log_n, log_d, log_l)
        if np.all(np.isfinite(theta)) and loss < best_loss:
            best, best_loss = theta, loss
    if best is None:
        raise FitError("L-BFGS did not converge from any initialisation")
    return best


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(t) for t in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def chinchilla_loss(params: dict, n, d) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""
    n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def compute_optimal(params: dict, flops: float) -> dict[str, float]:
    """N*(C), D*(C) and L* for C = 6 N D (Hoffmann et al. 2022, eq. 4).

    N* = G (C/6)^(beta/(alpha+beta)), D* = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    alpha, beta = params["alpha"], params["beta"]
    if alpha <= 0 or beta <= 0:
        return {"flops": flops, "N_opt": math.nan, "D_opt": math.nan, "loss": math.nan}
    g = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / (alpha + beta))
    n_opt = g * (flops / 6.0) ** (beta / (alpha + beta))
    d_opt = (flops / 6.0) ** (alpha / (alpha + beta)) / g
    return {"flops": flops, "N_opt": n_opt, "D_opt": d_opt, "loss": float(chinchilla_loss(params, n_opt, d_opt))}


def fit_chinchilla(n, d, loss, *, bootstrap: int = 100, seed: int = 0, target_flops: float | None = None,
                   init_grid: dict | None = None, n_starts: int = 16) -> dict:
    """Chinchilla approach 3: fits (E, A, B, alpha, beta) to final losses of runs (N params, D tokens).

    Summed Huber (delta 1e-3) on log-loss residuals, L-BFGS from a grid of initialisations, best
    kept (Hoffmann et al. 2022, app. D.2; summed, not averaged, as Besiroglu et al. 2024 note matters). Bootstrap: resample points with replacement and refit from the best
    solution; 95% percentile intervals for every parameter and for the compute-optimal quantities.
    """
    n, d, loss = _arrays(n, d, loss)
    _need(len(n), len(CHINCHILLA_KEYS), "chinchilla")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = init_grid or INIT_GRID
    inits_G5 = np.array([[a, b, e, al, be] for al, be, e, a, b in
                         itertools.product(grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"])])
    # Hoffmann et al. run L-BFGS from all 4,500 grid points; scoring the grid first and starting from
    # the best `n_starts` finds the same optimum at ~1% of the cost (the tail starts from flat regions).
    best_G = np.argsort(_grid_scores(inits_G5, log_n, log_d, log_l))[:n_starts]
    with _one_blas_thread():
        theta = _fit_theta(log_n, log_d, log_l, list(inits_G5[best_G]))
        out = _chinchilla_bootstrap(theta, log_n, log_d, log_l, bootstrap, seed, target_flops)
    params = _theta_to_params(theta)
    out.update({"form": "chinchilla", "params": params, "n_points": len(n),
                "huber_loss": float(_huber_objective(theta, log_n, log_d, log_l)[0]),
                "residuals": (log_l - np.log(chinchilla_loss(params, n, d))).tolist()})
    if target_flops:
        out["target"] = compute_optimal(params, target_flops)
    return out


def _chinchilla_bootstrap(theta, log_n, log_d, log_l, bootstrap: int, seed: int, target_flops) -> dict:
    """Resample points with replacement, refit from the full-data optimum; 95% percentile intervals."""
    rng = np.random.default_rng(seed)
    keys = list(CHINCHILLA_KEYS) + (["N_opt", "D_opt", "loss_opt"] if target_flops else [])
    samples = np.full((bootstrap, len(keys)), np.nan)
    for i in range(bootstrap):
        idx = rng.integers(0, len(log_n), len(log_n))
        th = _fit_theta(log_n[idx], log_d[idx], log_l[idx], [theta])
        p = _theta_to_params(th)
        row = [p[k] for k in CHINCHILLA_KEYS]
        if target_flops:
            opt = compute_optimal(p, target_flops)
            row += [opt["N_opt"], opt["D_opt"], opt["loss"]]
        samples[i] = row
    return {"intervals": {k: _interval(samples[:, j]) for j, k in enumerate(keys)}, "bootstrap": bootstrap}


# --- IsoFLOP (approach 2) -------------------------------------------------------------------------


def _isoflop_core(n, c, loss) -> tuple[list[dict], float, float]:
    budgets = []
    for budget in np.unique(c):
        m = c == budget
        if m.sum() < 3:
            raise FitError(f"isoflop: budget {budget:.3g} FLOPs has {int(m.sum())} points; a parabola needs >= 3")
        x = np.log(n[m])
        if len(np.unique(x)) < 3:
            raise FitError(f"isoflop: budget {budget:.3g} FLOPs has < 3 distinct model sizes; vary N per budget")
        coef = np.polyfit(x, loss[m], 2)  # L = c2 x^2 + c1 x + c0, x = ln N
        if coef[0] <= 0:
            raise FitError(f"isoflop: budget {budget:.3g} FLOPs has no minimum (parabola opens downward); "
                           "widen the range of N around the optimum")
        x_opt = -coef[1] / (2 * coef[0])
        budgets.append({"flops": float(budget), "coef": coef.tolist(), "N_opt": float(math.exp(x_opt)),
                        "loss_opt": float(np.polyval(coef, x_opt))})
    if len(budgets) < 2:
        raise FitError(f"isoflop: needs >= 2 compute budgets for the power law, got {len(budgets)}")
    slope, intercept = np.polyfit(np.log([b["flops"] for b in budgets]), np.log([b["N_opt"] for b in budgets]), 1)
    return budgets, float(slope), float(intercept)


def fit_isoflop(n, flops_budget, loss, *, bootstrap: int = 100, seed: int = 0,
                target_flops: float | None = None) -> dict:
    """Chinchilla approach 2: per compute budget a parabola of loss in ln N; its vertex is N_opt(C).

    A power law N_opt = k C^a is fitted through the vertices (least squares in log-log); D_opt = C / (6 N_opt)
    so D_opt ∝ C^(1-a). Bootstrap resamples points within each budget.
    """
    n, c, loss = _arrays(n, flops_budget, loss)
    budgets, slope, intercept = _isoflop_core(n, c, loss)
    out = {"form": "isoflop", "budgets": budgets, "n_points": len(n),
           "params": {"a": slope, "log_k": intercept, "b": 1.0 - slope}}
    rng = np.random.default_rng(seed)
    samples = []
    groups = [np.flatnonzero(c == b) for b in np.unique(c)]
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        try:
            samples.append(_isoflop_core(n[idx], c[idx], loss[idx])[1])
        except FitError:  # a resample with < 3 distinct sizes in a budget: skip it
            continue
    samples = np.array(samples, dtype=np.float64)
    out["intervals"] = {"a": _interval(samples), "b": _interval(1.0 - samples)}
    out["bootstrap"] = len(samples)
    if target_flops:
        n_opt = math.exp(intercept) * target_flops**slope
        out["target"] = {"flops": target_flops, "N_opt": n_opt, "D_opt": target_flops / (6 * n_opt)}
    return out


# --- MoE-aware (Clark et al. 2022) ----------------------------------------------------------------

E_START, E_MAX = 1.847, 314.478  # Clark et al. 2022 S-BASE fit of the saturating transform


def e_hat(e, e_start: float = E_START, e_max: float = E_MAX) -> np.ndarray:
    """Clark et al. 2022 saturating expert count: 1/E^ = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max.

    E^(1) = E_start and E^ -> E_max as E -> inf: more experts help less and less.
    """
    e = np.asarray(e, dtype=np.float64)
    return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def _moe_design(n, e_transformed) -> np.ndarray:
    x, y = np.log10(n), np.log10(e_transformed)
    return np.stack([x, y, x * y, np.ones_like(x)], axis=1)


def moe_loss(params: dict, n, e) -> np.ndarray:
    """L(N, E) from log10 L = a log10 N + b log10 E^ + c log10 N log10 E^ + d (Clark et al. 2022, eq. 3)."""
    eh = e_hat(e, params["e_start"], params["e_max"]) if params["saturating"] else np.asarray(e, np.float64)
    w = np.array([params[k] for k in "abcd"])
    return 10.0 ** (_moe_design(np.asarray(n, np.float64), eh) @ w)


def fit_moe(n_active, num_experts, loss, *, saturating: bool = True,
            e_start: float = E_START, e_max: float = E_MAX) -> dict:
    """Clark et al. 2022 bilinear law in (log N, log E^), N = active (dense-equivalent) parameters.

    Logs are base 10 so coefficients compare with the paper's tables. With E_start, E_max fixed the
    law is linear in (a, b, c, d): ordinary least squares; 95% intervals from the OLS covariance
    (t quantile). `saturating=False` uses plain E.
    """
    from scipy.stats import t as student_t

    n, e, loss = _arrays(n_active, num_experts, loss)
    _need(len(n), 4, "moe")
    eh = e_hat(e, e_start, e_max) if saturating else e
    if len(np.unique(e)) < 2 or len(np.unique(n)) < 2:
        raise FitError("moe fit needs >= 2 distinct active sizes and >= 2 distinct expert counts")
    x = _moe_design(n, eh)
    y = np.log10(loss)
    w, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    if rank < 4:
        raise FitError("moe fit: design is rank-deficient; vary N and E independently")
    resid = y - x @ w
    dof = len(y) - 4
    out = {"form": "moe", "n_points": len(n), "saturating": saturating,
           "params": {**dict(zip("abcd", map(float, w))), "e_start": e_start, "e_max": e_max,
                      "saturating": saturating},
           "residuals": resid.tolist()}
    if dof > 0:
        sigma2 = float(resid @ resid) / dof
        se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
        q = float(student_t.ppf(0.975, dof))
        out["intervals"] = {k: [float(w[i] - q * se[i]), float(w[i] + q * se[i])] for i, k in enumerate("abcd")}
    else:
        out["intervals"] = {k: [math.nan, math.nan] for k in "abcd"}
    return out
