"""Scaling-law fits recover known laws from synthetic data (moe.scaling.fit)."""

import math

import numpy as np
import pytest

from moe.scaling import fit as sf

# Epoch AI's refit of Chinchilla (Besiroglu et al. 2024).
TRUE = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}


def _chinchilla_data(noise: float = 0.002, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 7), np.geomspace(1e8, 1e12, 7))
    n, d = n.ravel(), d.ravel()
    loss = sf.chinchilla_loss(TRUE, n, d) * np.exp(rng.normal(0.0, noise, n.size))
    return n, d, loss


def test_chinchilla_recovers_exponents_and_predicts_held_out():
    n, d, loss = _chinchilla_data()
    held = np.random.default_rng(1).permutation(n.size)[:10]
    train = np.setdiff1d(np.arange(n.size), held)
    fit = sf.fit_chinchilla(n[train], d[train], loss[train], bootstrap=20, target_flops=1e23)
    p = fit["params"]
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.02
    assert abs(p["beta"] - TRUE["beta"]) < 0.02
    rel = np.abs(sf.chinchilla_loss(p, n[held], d[held]) / loss[held] - 1)
    assert rel.max() < 0.01
    lo, hi = fit["intervals"]["alpha"]
    assert lo <= p["alpha"] <= hi and hi - lo < 0.05
    assert fit["target"]["N_opt"] > 0 and len(fit["residuals"]) == train.size


def test_compute_optimal_is_the_isoflop_minimum():
    c = 1e22
    opt = sf.compute_optimal(TRUE, c)
    assert opt["N_opt"] * opt["D_opt"] * 6 == pytest.approx(c, rel=1e-9)
    # L along the IsoFLOP line C = 6 N D has its minimum at N*: a brute-force scan agrees.
    n = np.geomspace(opt["N_opt"] / 3, opt["N_opt"] * 3, 20001)
    n_best = n[np.argmin(sf.chinchilla_loss(TRUE, n, c / (6 * n)))]
    assert n_best == pytest.approx(opt["N_opt"], rel=1e-3)
    assert opt["loss"] == pytest.approx(float(sf.chinchilla_loss(TRUE, opt["N_opt"], opt["D_opt"])), rel=1e-12)


def test_isoflop_finds_the_known_optimum():
    rng = np.random.default_rng(0)
    budgets = [1e18, 1e19, 1e20, 1e21]
    n_all, c_all = [], []
    for c in budgets:
        n_all += list(sf.compute_optimal(TRUE, c)["N_opt"] * np.geomspace(1 / 4, 4, 9))
        c_all += [c] * 9
    n_all, c_all = np.array(n_all), np.array(c_all)
    loss = sf.chinchilla_loss(TRUE, n_all, c_all / (6 * n_all)) * np.exp(rng.normal(0, 1e-4, n_all.size))
    fit = sf.fit_isoflop(n_all, c_all, loss, bootstrap=20, target_flops=1e23)
    for b in fit["budgets"]:
        assert b["N_opt"] == pytest.approx(sf.compute_optimal(TRUE, b["flops"])["N_opt"], rel=0.1)
    exponent = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # Hoffmann et al. eq. 4
    assert abs(fit["params"]["a"] - exponent) < 0.02
    assert fit["target"]["N_opt"] == pytest.approx(sf.compute_optimal(TRUE, 1e23)["N_opt"], rel=0.15)


def test_moe_fit_recovers_coefficients():
    truth = {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "e_start": sf.E_START, "e_max": sf.E_MAX,
             "saturating": True}  # Clark et al. 2022's S-BASE law
    rng = np.random.default_rng(0)
    n, e = np.meshgrid(np.geomspace(1e7, 1e9, 5), [1, 4, 8, 32, 64, 128, 512])
    n, e = n.ravel(), e.ravel()
    loss = sf.moe_loss(truth, n, e) * np.exp(rng.normal(0, 1e-3, n.size))
    fit = sf.fit_moe(n, e, loss)
    for k, tol in (("a", 0.005), ("b", 0.01), ("c", 0.002), ("d", 0.05)):
        assert abs(fit["params"][k] - truth[k]) < tol, k
        lo, hi = fit["intervals"][k]
        assert lo < fit["params"][k] < hi
    assert np.allclose(sf.moe_loss(fit["params"], n, e), loss, rtol=0.01)


def test_e_hat_saturates():
    assert sf.e_hat(1.0) == pytest.approx(sf.E_START)
    assert sf.e_hat(1e9) == pytest.approx(sf.E_MAX, rel=1e-5)
    assert np.all(np.diff(sf.e_hat(np.array([1, 2, 8, 64, 512]))) > 0)


def test_fewer_points_than_parameters_is_a_clear_error():
    n, d, loss = _chinchilla_data()
    with pytest.raises(sf.FitError, match="5 parameters but only 4 points"):
        sf.fit_chinchilla(n[:4], d[:4], loss[:4])
    with pytest.raises(sf.FitError, match="4 parameters but only 3 points"):
        sf.fit_moe([1e7, 1e8, 1e9], [1, 8, 64], [3.0, 2.9, 2.8])
    with pytest.raises(sf.FitError, match="a parabola needs >= 3"):
        sf.fit_isoflop([1e7, 1e8, 1e7, 2e7, 4e7], [1e18, 1e18, 1e19, 1e19, 1e19], [3.0, 2.9, 3.0, 2.8, 2.9])
    with pytest.raises(sf.FitError, match="distinct expert counts"):
        sf.fit_moe([1e7, 1e8, 1e9, 1e10], [8, 8, 8, 8], [3.0, 2.9, 2.8, 2.7])
    with pytest.raises(sf.FitError, match="finite positive"):
        sf.fit_chinchilla(n[:6], d[:6], [3.0, 2.9, math.nan, 2.7, 2.6, 2.5])
